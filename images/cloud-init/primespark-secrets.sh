#!/bin/sh
# Pull this host's service secrets from Vault with its AppRole, into 0600 env files that compose reads.
# The AppRole secret-id is placed by the configuration run (never in user-data); the role-id is not secret.
set -eu
. /etc/primespark/vault.env
[ -s "$VAULT_SECRET_ID_FILE" ] || { echo "primespark-secrets: waiting for $VAULT_SECRET_ID_FILE" >&2; exit 1; }
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
jq -n --arg role_id "$VAULT_ROLE_ID" --rawfile secret_id "$VAULT_SECRET_ID_FILE" \
  '{role_id: $role_id, secret_id: ($secret_id | rtrimstr("\n"))}' > "$work/login.json"
curl -sSf --data @"$work/login.json" "$VAULT_ADDR/v1/auth/approle/login" | jq -r .auth.client_token \
  | sed 's/^/X-Vault-Token: /' > "$work/token.header"
mkdir -p /etc/primespark/secrets
while read -r service path; do
  [ -n "$service" ] || continue
  curl -sSf -H @"$work/token.header" "$VAULT_ADDR/v1/$VAULT_KV_MOUNT/data/$path" \
    | jq -r '.data.data | to_entries[] | "\(.key)=\(.value)"' > "$work/$service.env"
  mv "$work/$service.env" "/etc/primespark/secrets/$service.env"
done < /etc/primespark/vault/paths
