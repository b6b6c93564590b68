"""Teacher latent subspace learning: choose each group's subspace from the teacher's latents,
build the student, train it on the teacher with LASSO, and run the whole compress() pipeline."""
