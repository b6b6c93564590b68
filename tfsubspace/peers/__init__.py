"""The methods tfsubspace is compared with (KD, FitNets, L1 filter pruning, Network Slimming,
training from scratch), and TFMOT, run in its own tf_keras process through a layer-spec bridge."""
