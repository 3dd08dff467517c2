"""Fleet mode (DESIGN §11): persistent secrets shared by many hosts through etcd, as ciphertext."""
