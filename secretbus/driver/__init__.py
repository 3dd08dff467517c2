"""libvirt's secret API rules over the in-memory table and a store."""
