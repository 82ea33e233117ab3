"""Prime Spark's CrossGuard pack (rules.py) and Vault ACL policies (vault/)."""
