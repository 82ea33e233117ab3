#!/bin/bash
# Pull this host's service secrets from Vault with its AppRole into 0600 env files that compose reads, then
# restart the stack. Fails closed: if Vault is down or sealed, the login is refused, or an answer is malformed
# or partial, the previous env files stay byte for byte, nothing restarts, and the unit fails with the reason
# in the journal (after a few tries with backoff). The AppRole secret-id is placed by the configuration run
# (never in user-data); the role-id is not secret. The token and the login body live in files, never in argv.
set -euo pipefail
shopt -s nullglob

# The VM's paths and commands; tests point them elsewhere.
vault_env=${PRIMESPARK_VAULT_ENV:-/etc/primespark/vault.env}
paths_file=${PRIMESPARK_VAULT_PATHS:-/etc/primespark/vault/paths}
secrets_dir=${PRIMESPARK_SECRETS_DIR:-/etc/primespark/secrets}
restart=${PRIMESPARK_STACK_RESTART:-systemctl --no-block restart primespark-stack.service}
attempts=${PRIMESPARK_SECRETS_ATTEMPTS:-6}
delay=${PRIMESPARK_SECRETS_DELAY:-2}  # seconds before the second attempt, doubled after each failure

say() { echo "primespark-secrets: $*" >&2; }
give_up() { say "$*; the previous env files are kept and the stack is not restarted"; exit 1; }

# shellcheck source=/dev/null
. "$vault_env"
: "${VAULT_ADDR:?} ${VAULT_KV_MOUNT:?} ${VAULT_ROLE_ID:?} ${VAULT_SECRET_ID_FILE:?}"
[ -s "$VAULT_SECRET_ID_FILE" ] || give_up "waiting for $VAULT_SECRET_ID_FILE"

umask 077
mkdir -p "$secrets_dir"
work=$(mktemp -d)
staging=$(mktemp -d "$secrets_dir/.staging.XXXXXX")  # beside the env files: each rename is atomic
trap 'rm -rf "$work" "$staging"' EXIT

# api OUT PATH [CURL ARGS…]: Vault's JSON answer in OUT if it is HTTP 200; otherwise the reason on stderr, 1.
api() {
  local out=$1 path=$2 status reason
  shift 2
  if ! status=$(curl -sS --connect-timeout 5 --max-time 30 -o "$out" -w '%{http_code}' "$@" \
      "$VAULT_ADDR/v1/$path"); then
    say "$path: no answer from $VAULT_ADDR"
    return 1
  fi
  if [ "$status" != 200 ]; then
    reason=$(jq -r '.errors // [] | join("; ")' "$out" 2>/dev/null | tr -s '\n\t' '  ' | head -c 300) || true
    say "$path: HTTP $status from $VAULT_ADDR${reason:+: $reason}"
    return 1
  fi
}

# A KV v2 answer is usable if .data.data is a non-empty object of one-line strings under env-variable names.
# shellcheck disable=SC2016
valid_secret='(.data.data | type) == "object" and (.data.data | length) > 0 and all(.data.data | to_entries[];
  (.key | test("^[A-Za-z_][A-Za-z0-9_]*$")) and (.value | type) == "string" and (.value | test("^[^\n\r]+$")))'

# One attempt: log in, read every path, write the env files into the staging folder. `set -e` does not apply
# inside a function called as a condition, so every step checks its own status.
pull() {
  local service path count=0
  rm -f "$staging"/*
  jq -n --arg role_id "$VAULT_ROLE_ID" --rawfile secret_id "$VAULT_SECRET_ID_FILE" \
    '{role_id: $role_id, secret_id: ($secret_id | rtrimstr("\n"))}' > "$work/login.json" || return 1
  api "$work/login.out" auth/approle/login --data @"$work/login.json" || return 1
  if ! jq -er '.auth.client_token | select(type == "string" and length > 0) | "X-Vault-Token: " + .' \
      "$work/login.out" > "$work/token.header" 2>/dev/null; then
    say "auth/approle/login: the answer holds no client token"
    return 1
  fi
  while read -r service path; do
    [ -n "$service" ] || continue
    if ! [[ $service =~ ^[a-z0-9][a-z0-9_-]*$ && -n $path ]]; then
      say "$paths_file: bad line '$service $path'"
      return 1
    fi
    api "$work/$service.json" "$VAULT_KV_MOUNT/data/$path" -H @"$work/token.header" || return 1
    if ! jq -e "$valid_secret" "$work/$service.json" > /dev/null 2>&1; then
      say "$VAULT_KV_MOUNT/data/$path: not a complete secret (malformed JSON, no data, or values that cannot be env lines)"
      return 1
    fi
    jq -r '.data.data | to_entries[] | "\(.key)=\(.value)"' "$work/$service.json" > "$staging/$service.env" \
      || return 1
    count=$((count + 1))
  done < "$paths_file"
  say "read $count secret(s) from $VAULT_ADDR"
}

attempt=1
until pull; do
  [ "$attempt" -lt "$attempts" ] || give_up "no complete set of secrets after $attempts attempt(s)"
  say "attempt $attempt of $attempts failed; next in ${delay}s"
  sleep "$delay"
  delay=$((delay * 2))
  attempt=$((attempt + 1))
done

# Every answer was complete: only now do the env files change, then the stack restarts to read them.
for file in "$staging"/*.env; do
  mv -f "$file" "$secrets_dir/${file##*/}"
done
sh -c "$restart" || { say "the env files are new but restarting the stack failed: $restart"; exit 1; }
