"""Where the monitoring files live on the Prometheus/Alertmanager host. The lab's Debian packages and the compose
stack's containers see the same paths, so each generated file reads the same wherever it runs."""

CONFIG_DIR = "/etc/prometheus"
RULES_FILE = f"{CONFIG_DIR}/rules/primespark.rules.yml"
# Alertmanager reads receivers' secrets here (files named <receiver>.<field>, written from the fleet's references).
SECRETS_DIR = f"{CONFIG_DIR}/alertmanager-secrets"
# On a compose host: the folder mounted at SECRETS_DIR inside the Alertmanager container.
HOST_SECRETS_DIR = "/etc/primespark/monitoring-secrets"
