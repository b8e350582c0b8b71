"""The Kubernetes runtime: each run a batch/v1 Job (docs/kubernetes.md).

Only `manifests` (pure: the Job bodies and the checks the schemas do not make) has landed so
far; the `LinkRuntime` over the official `kubernetes` client is to come.
"""
