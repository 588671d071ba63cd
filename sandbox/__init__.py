"""The test sandbox: a real Kubernetes control plane on loopback plus an emulated node.

Used by pytest (session fixture in tests/conftest.py) and by `hack/sandbox up|down`.
"""
