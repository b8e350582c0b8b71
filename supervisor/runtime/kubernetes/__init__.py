"""The Kubernetes runtime: each run a batch/v1 Job, linked through the run channel (docs/kubernetes.md).

- `manifests`: the Job bodies (pure) and the checks the schemas do not make;
- `states`: pod and Job states -> the run's end (pure, table-tested);
- `runtime`: `KubernetesRuntime` over the official `kubernetes` client (the one importer).
"""
