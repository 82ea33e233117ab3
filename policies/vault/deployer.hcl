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
