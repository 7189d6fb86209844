"""Every side effect xpando has: providers, routing, knowledge, ledger, chain."""
