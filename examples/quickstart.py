"""Quickstart: where does SmolLM2-135M recall that the Eiffel Tower is in Paris?

    python examples/quickstart.py      # offline; about a minute on a 2-core CPU
"""
from lens_rome import load_model, trace

model = load_model("smollm2-135m")  # embedded: loads offline from its pip package
result = trace(model, "The Eiffel Tower is located in the city of", "The Eiffel Tower", kind="mlp")
print(f"p({result.answer!r}): clean {result.high_score:.3f}, corrupted {result.low_score:.3f}")
print(result.to_frame().sort_values("score", ascending=False).head())  # one row per (token, layer)
result.plot().savefig("quickstart_mlp.png", dpi=150, bbox_inches="tight")  # the paper's heatmap
result.show().save("quickstart_mlp.html", overwrite=True)  # circuitsvis view that works offline
