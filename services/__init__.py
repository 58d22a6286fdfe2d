"""What every orz-async process shares: config, wire protocol, Redis queue, weight sync, metrics, CLI."""
