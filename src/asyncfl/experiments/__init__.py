"""Reproduced experiments: Papaya's sync-vs-FedBuff table and FedBuff's speedup table."""
