"""The Kubernetes end-to-end tier: a cluster of two nodes in the test VM."""
