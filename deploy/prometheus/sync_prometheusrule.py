"""Write deploy/k8s/monitoring/prometheusrule.yaml from deploy/prometheus/alerts.yaml.

The plain rule file is the source; the PrometheusRule (Prometheus Operator)
carries the same groups. tests/test_deploy.py fails when they differ.

    python deploy/prometheus/sync_prometheusrule.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yaml"
TARGET = HERE.parent / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by
# deploy/prometheus/sync_prometheusrule.py -- edit that file, then re-run.
#
# Your Prometheus picks this up only if its ruleSelector matches these labels
# (kube-prometheus-stack: `release: <helm release name>`, or set
# ruleSelectorNilUsesHelmValues=false to select every PrometheusRule).
"""


def render() -> str:
    groups = yaml.safe_load(SOURCE.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "credicorp-token-proxy",
            "labels": {"app.kubernetes.io/name": "credicorp-token-proxy", "role": "alert-rules"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=10_000, allow_unicode=True)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
