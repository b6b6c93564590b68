"""Channel pruning: trace a Keras graph, group the channels that must go together (`analysis`,
`channels`), rank and plan what to remove, and rebuild physically slimmer layers (`surgery`)."""
