"""The edge: convert to .tflite (float32, float16, dynamic range, int8), check every file
against its Keras model, and measure size, latency, Edge TPU fit and microcontroller arena."""
