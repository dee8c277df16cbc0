"""Pictures of what a run learned: conv1 filter sheets (`filters`) and cluster montages (`montage`)."""
