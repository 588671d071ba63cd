"""The inventory of what runs in the cluster (scangate.inventory.inventory)."""
