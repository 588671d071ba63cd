"""The custom resources as pydantic models: the single source of truth for crds/."""

from scangate.api.imagescan import ImageScan
from scangate.api.scanpolicy import ScanPolicy
from scangate.api.scanrule import ScanRule

GROUP = "scangate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["API_VERSION", "GROUP", "VERSION", "ImageScan", "ScanPolicy", "ScanRule"]
