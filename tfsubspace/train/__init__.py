"""Training runs that survive: one resumable fit loop with atomic epoch checkpoints, work
directories with a manifest and a lock, tf.distribute strategies, and teacher training."""
