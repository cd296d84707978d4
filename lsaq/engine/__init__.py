"""The layer-streaming engine: a checkpoint read one module at a time, the model skeleton without its decoder
layers' weights, every layer's own call arguments, and the walk that loads, runs and releases one layer at a time."""
