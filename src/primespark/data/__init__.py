"""Moving data between hosts: one transfer engine (`transfer`: rsync over `primespark.hosts`), the sync jobs of
the fleet (`sync`, `watch`), and the layout that sync and tier migration share (`layout`)."""
