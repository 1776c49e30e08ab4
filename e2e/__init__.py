"""The Kubernetes end-to-end tier (issue 17): a one-node cluster in the test VM."""
