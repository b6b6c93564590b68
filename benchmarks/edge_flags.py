"""The models every edge benchmark (edge.py, edge_widths.py, edge_layers.py) measures by default:
the VGG-16 (width 0.25) MNIST teacher of benchmarks/teachers.py and the tfsubspace student that
benchmarks/compare.py makes of it at the 90% budget. One place, so the three stay about the
same pair of models."""

from absl import flags

TEACHER = flags.DEFINE_string("teacher", "runs/teachers/vgg16_w0.25_mnist.keras", "Teacher (.keras).")
STUDENT = flags.DEFINE_string(
    "student", "runs/compare/cpu/vgg16_w0.25_mnist/budget0.9/end_to_end/student.keras", "Student (.keras)."
)
DATASET = flags.DEFINE_string("dataset", "mnist", "Calibration and test data set (edge.py, edge_widths.py).")
