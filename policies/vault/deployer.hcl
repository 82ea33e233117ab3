# What `spark up` (the Pulumi VaultSecrets provider) needs: manage the fleet's service secrets, its per-host
# ACL policies and AppRoles. Give this to the token in VAULT_TOKEN when running `spark up`, not root.
path "secret/data/primespark/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "secret/metadata/primespark/*" {
  capabilities = ["read", "list", "delete"]
}
path "sys/policies/acl/primespark-*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "sys/auth" {
  capabilities = ["read"]
}
path "sys/auth/approle" {
  capabilities = ["create", "read", "update", "sudo"]
}
path "auth/approle/role/primespark-*" {
  capabilities = ["create", "read", "update", "delete", "list"]
}
path "auth/approle/role/" {
  capabilities = ["list"]
}
# The fleet CA (primespark.pki): enable its PKI mount, generate its root once, manage the hosts' roles and their
# policies (above). Not issue, sign or revoke: the deployer certifies no one.
path "sys/mounts" {
  capabilities = ["read"]
}
path "sys/mounts/primespark-pki/*" {
  capabilities = ["create", "read", "update"]
}
path "sys/policies/acl/" {
  capabilities = ["list"]
}
path "primespark-pki/+/root/generate/internal" {
  capabilities = ["update"]
}
path "primespark-pki/+/issuers/" {
  capabilities = ["list"]
}
path "primespark-pki/+/roles/" {
  capabilities = ["list"]
}
path "primespark-pki/+/roles/*" {
  capabilities = ["create", "read", "update", "delete"]
}
