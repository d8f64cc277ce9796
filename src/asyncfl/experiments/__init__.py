"""Reproduced experiments: Papaya's sync-vs-FedBuff table, FedBuff's speedup table, and utility
against privacy (DP-FedAvg and DP-FedBuff at several epsilons)."""
