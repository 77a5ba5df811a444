"""fastseq: federated fine-tuning with Sequential Compression Layers."""
