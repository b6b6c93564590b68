"""Why a full-int8 file disagrees with its float model: rounding, or near-ties of the float model.

    python benchmarks/int8_margins.py [--models=mobilenetv2_student,mobilenetv2,mbv2_like_student]

For each model of benchmarks/int8.py (its .keras and its plain int8 file under --out_dir, which
`python benchmarks/int8.py` writes), on the first --examples Fashion-MNIST test images: top-1
agreement of the int8 file with the float model, the median top-2 logit margin of the float
model, the median largest logit error of the int8 file, the share of images whose margin is
under their error, and the share of disagreements that are such near-ties. Prints a Markdown
table (cited in benchmarks/README.md, "Full int8").
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out_dir", "runs/int8", "Where benchmarks/int8.py put the models and .tflite files.")
_MODELS = flags.DEFINE_list("models", ["mobilenetv2_student", "mobilenetv2", "mbv2_like_student"], "Models.")
_EXAMPLES = flags.DEFINE_integer("examples", 2000, "Test images.", lower_bound=1)


def main(argv):
    del argv
    import numpy as np

    from tfsubspace import data, load_model
    from tfsubspace.edge.runtime import TFLiteRunner

    x = data.load_arrays("fashion_mnist", "test")[0][: _EXAMPLES.value].astype("float32")  # 0-255 pixels
    print("| model | agreement | median margin | median int8 error | margin < error | near-tie disagreements |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in _MODELS.value:
        logits = np.asarray(load_model(f"{_OUT.value}/{name}.keras").predict(x, batch_size=256, verbose=0))
        int8 = TFLiteRunner(f"{_OUT.value}/tflite/{name}_int8_plain.tflite")(x)
        top2 = np.sort(logits, -1)
        margin, error = top2[:, -1] - top2[:, -2], np.abs(logits - int8).max(-1)
        differ = logits.argmax(-1) != int8.argmax(-1)
        near = np.mean(margin[differ] < error[differ]) if differ.any() else 0.0
        print(
            f"| {name} | {1 - differ.mean():.2%} | {np.median(margin):.3f} | {np.median(error):.3f} | "
            f"{np.mean(margin < error):.1%} | {near:.0%} |"
        )


if __name__ == "__main__":
    app.run(main)
