"""The libvirt-layout file store: value-file codecs, secret.conf, keys, paths, lock, durable writes."""
