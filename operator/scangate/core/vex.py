"""VEX: OpenVEX documents that say a vulnerability does not affect an image.

Where the documents are, and who applies them:

- They live in ConfigMaps of the operator's namespace (a ScanPolicy is cluster-scoped and
  has no namespace of its own; a tenant's ConfigMap is never read), referenced by
  ScanPolicy spec.vex as {name, key}, or all keys of the ConfigMap the operator's
  `vexConfigMap` setting names (applied under every policy).
- At scan time Trivy applies every referenced document (`--vex`, each mounted into the scan
  Job from its ConfigMap): it matches statements to packages by purl, as only it can, and
  its suppressed findings are stored apart (status.suppressed, with status, justification
  and the document), never counted in status.summary.
- At admission the gate judges with the documents as they are *now*, per policy: a finding
  suppressed at scan time counts again for a policy that does not reference its document,
  or when the document no longer holds a statement for it (removed: judged again at once,
  no rescan); a statement added since the scan subtracts exactly the findings of its
  vulnerability by the result's per-ID index, like an allowlist entry, when it names no
  subcomponent (with subcomponents, by the findings kept in status if they are complete;
  else it waits for the next scan, and the message says so).

Trivy 0.76 applies CycloneDX VEX to SBOM scans only, not to images: only OpenVEX is taken.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from scangate.core.scanstate import resource_version

MOUNT = "/etc/scangate/vex"
"""Where a scan Job mounts each referenced ConfigMap (MOUNT/<configmap>/<key>)."""
SUPPRESSING = frozenset({"not_affected", "fixed"})
"""Statement statuses that suppress a finding (as Trivy does); affected and
under_investigation do not."""
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_STATEMENTS = 10_000


class VexError(ValueError):
    """A document that is not usable OpenVEX, with the reason."""


def document_name(configmap: str, key: str) -> str:
    """How a document is named in status, messages and policies: configmap/key."""
    return f"{configmap}/{key}"


def source_of(path: str) -> str:
    """The document name of a path Trivy reports as a finding's Source."""
    if path.startswith(MOUNT + "/"):
        parts = path[len(MOUNT) + 1:].split("/")
        if len(parts) == 2:
            return document_name(*parts)
    return path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Statement:
    """One statement that suppresses: its vulnerability, where it applies, and why."""

    ids: frozenset[str]
    """The vulnerability's name and aliases, upper-cased."""
    status: str
    justification: str
    products: tuple[str, ...]
    subcomponents: tuple[str, ...] = ()


@dataclass(frozen=True)
class VexDocument:
    """The suppressing statements of one OpenVEX document, by upper-cased vulnerability ID."""

    name: str
    statements: Mapping[str, tuple[Statement, ...]]


def _ids_of(raw: Any) -> list[str]:
    out = []
    for entry in raw if isinstance(raw, list) else [raw]:
        if isinstance(entry, dict):
            out += [entry.get("name"), entry.get("@id"), *(entry.get("aliases") or [])]
        elif isinstance(entry, str):
            out.append(entry)
    return [i.upper() for i in out if isinstance(i, str) and i]


def _identifiers(raw: Any) -> tuple[str, ...]:
    out = []
    for item in raw if isinstance(raw, list) else []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            ids = item.get("identifiers")
            purl = ids.get("purl") if isinstance(ids, dict) else None
            out += [v for v in (item.get("@id"), purl) if isinstance(v, str)]
    return tuple(dict.fromkeys(out))


def parse_openvex(name: str, text: str | bytes) -> VexDocument:
    """An OpenVEX document (v0.0.x or v0.2.x), keeping the statements that suppress."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise VexError(f"VEX document {name} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise VexError(f"VEX document {name} is not JSON: {e}") from None
    context = raw.get("@context") if isinstance(raw, dict) else None
    if not isinstance(context, str) or "openvex" not in context:
        raise VexError(f"VEX document {name} is not OpenVEX (its @context does not name "
                       "openvex; CycloneDX VEX is applied by Trivy to SBOMs only)")
    statements = raw.get("statements")
    if not isinstance(statements, list):
        raise VexError(f"VEX document {name} has no statements list")
    if len(statements) > MAX_STATEMENTS:
        raise VexError(f"VEX document {name} has more than {MAX_STATEMENTS} statements")
    by_id: dict[str, list[Statement]] = {}
    for i, s in enumerate(statements):
        if not isinstance(s, dict):
            raise VexError(f"VEX document {name}: statement {i} is not an object")
        status = s.get("status")
        if not isinstance(status, str):
            raise VexError(f"VEX document {name}: statement {i} has no status")
        ids = _ids_of(s.get("vulnerability"))
        if not ids:
            raise VexError(f"VEX document {name}: statement {i} names no vulnerability")
        if status not in SUPPRESSING:
            continue
        products = s.get("products")
        subcomponents: list[str] = []
        for product in products if isinstance(products, list) else []:
            if isinstance(product, dict):
                subcomponents += _identifiers(product.get("subcomponents"))
        justification = s.get("justification") or s.get("impact_statement") or ""
        statement = Statement(frozenset(ids), status, str(justification)[:200],
                              _identifiers(products), tuple(subcomponents))
        for vid in ids:
            by_id.setdefault(vid, []).append(statement)
    return VexDocument(name, {k: tuple(v) for k, v in by_id.items()})


# -- matching ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Purl:
    type: str
    name: str
    version: str
    qualifiers: Mapping[str, str]


def parse_purl(text: str) -> Purl | None:
    """The parts of a package URL scangate matches on; None if it is not one."""
    if not text.startswith("pkg:"):
        return None
    rest, _, query = text[4:].partition("?")
    rest = rest.partition("#")[0]
    path, _, version = rest.partition("@")
    kind, _, path = path.partition("/")
    qualifiers = dict(q.partition("=")[::2] for q in query.split("&") if q)
    return Purl(kind.lower(), unquote(path.rsplit("/", 1)[-1]).lower(), unquote(version),
                {k.lower(): unquote(v) for k, v in qualifiers.items()})


def image_matches(product: str, image: str, digests: tuple[str, ...]) -> bool:
    """Whether an OCI product (pkg:oci/name[@digest][?repository_url=...]) names the image
    (a normalised reference registry/repository[:tag][@digest]), as Trivy matches it."""
    purl = parse_purl(product)
    if purl is None or purl.type != "oci":
        return False
    repository = image.partition("@")[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    if purl.name != repository.rsplit("/", 1)[-1].lower():
        return False
    if purl.version and purl.version not in digests:
        return False
    url = purl.qualifiers.get("repository_url")
    return not url or url.lower() == repository.lower()


def packages_named(identifiers: tuple[str, ...]) -> frozenset[str]:
    """The package names of non-OCI purls."""
    return frozenset(p.name for i in identifiers
                     if (p := parse_purl(i)) is not None and p.type != "oci")


@dataclass(frozen=True)
class Scope:
    """Where a statement applies in one image: everywhere (packages None) or in the
    packages named."""

    statement: Statement
    packages: frozenset[str] | None


def scope_in(statement: Statement, image: str, digests: tuple[str, ...]) -> Scope | None:
    """Where the statement applies in the image, or None if it does not: a product that
    names the image (all its packages, or its subcomponents'), or products that are
    packages (those packages, in any image)."""
    if any(image_matches(p, image, digests) for p in statement.products):
        named = packages_named(statement.subcomponents)
        return Scope(statement, named if statement.subcomponents else None)
    named = packages_named(statement.products)
    return Scope(statement, named) if named else None


def applicable(documents: Mapping[str, VexDocument], names: tuple[str, ...], vid: str,
               image: str, digests: tuple[str, ...]) -> list[tuple[str, Scope]]:
    """(document, scope) of each statement of the named documents that suppresses `vid`
    in the image."""
    found = []
    for name in names:
        document = documents.get(name)
        for statement in (document.statements.get(vid.upper(), ()) if document else ()):
            scope = scope_in(statement, image, digests)
            if scope is not None:
                found.append((name, scope))
    return found


@dataclass(frozen=True)
class VexState:
    """The documents as the gate holds them now: parsed ones by name, the reason of each
    that is not usable, and the names applied under every policy (the vexConfigMap
    setting's keys)."""

    documents: Mapping[str, VexDocument]
    errors: Mapping[str, str]
    cluster_wide: tuple[str, ...] = ()


MAX_KEYS = 64
"""Keys of one ConfigMap read as documents (the rest are left out, and said so)."""


@dataclass(frozen=True)
class ConfigMapDocuments:
    """One ConfigMap's keys, parsed: documents, and the reason of each that is not one."""

    name: str
    version: int
    documents: dict[str, VexDocument] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def project_configmap(obj: dict[str, Any]) -> ConfigMapDocuments:
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    held = ConfigMapDocuments(name, resource_version(obj))
    data = obj.get("data") or {}
    for i, (key, text) in enumerate(sorted(data.items() if isinstance(data, dict) else [])):
        doc = document_name(name, str(key))
        if i >= MAX_KEYS:
            held.errors[doc] = f"ConfigMap {name} has more than {MAX_KEYS} keys"
            continue
        try:
            held.documents[doc] = parse_openvex(doc, str(text))
        except VexError as e:
            held.errors[doc] = str(e)
        except Exception as e:  # one hostile document is its own problem
            held.errors[doc] = f"{type(e).__name__}: {e}"
    return held
