"""Neural-network building blocks: causal masks, masked and gated convolutions, resnets."""
