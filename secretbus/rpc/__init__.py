"""libvirt's remote RPC protocol: the front end that makes secretbusd a drop-in for virtsecretd."""
