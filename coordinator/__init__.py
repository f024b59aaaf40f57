"""The coordinator: accepts jobs, elects a leader through etcd, and dispatches batches to nodes."""
