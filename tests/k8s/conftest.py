"""Fixtures of the Kubernetes runtime tests: the fake API server (tests/fakes/kube_api.py)."""

from __future__ import annotations

from tests.fakes.kube_fixtures import fake_kube, fake_kubeconfig

__all__ = ["fake_kube", "fake_kubeconfig"]
