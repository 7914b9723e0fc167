"""Real servers on loopback for the local stack and the tests: etcd + kube-apiserver +
kube-controller-manager, and MinIO. Binaries come from ``tools/install-test-tools``."""
