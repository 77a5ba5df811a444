"""Regenerate the vendored PEFT test files of this folder from a PEFT git checkout.

    python tests/peft_conformance/vendor_peft_tests.py /path/to/peft/.git 5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40

Writes testing_common.py (PEFT's, with the edits marked ``# fastseq:``) and the three test
modules. Each test module keeps, verbatim, the generic test methods of PEFT's test class (the
ones parametrized over PEFT's case list), PEFT's ``prepare_inputs_for_testing`` and the helper
functions they call; the case lists and models come from cases.py. See README.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LICENSE_HEADER_LINES = 13  # PEFT's Apache-2.0 header at the top of every file

# Test methods left out, with the reason (docs/internals.md lists them too).
LEFT_OUT = {
    "test_prompt_tuning_text_prepare_for_training": "prompt tuning only",
    "test_prompt_tuning_sample_vocab_prepare_for_training": "prompt tuning only",
    "test_training_prompt_learning_tasks": "prompt learning only",
    "test_set_requires_grad_prompt_learning_raises": "prompt learning only",
    "test_weighted_combination_of_adapters": "add_weighted_adapter is LoRA's / IA3's own API",
    "test_lora_conversion": "converts an adapter to LoRA; SCL is nonlinear (and LoRA to LoRA says nothing here)",
}

COMMON_EDITS = [
    ("from diffusers import StableDiffusionPipeline\n",
     "# fastseq: diffusers is no fastseq dependency and no case here is a diffusers pipeline: an empty tuple\n"
     "# makes the `isinstance(model, StableDiffusionPipeline)` checks below False.\n"
     "StableDiffusionPipeline = ()\n"),
    ("from .testing_utils import get_state_dict, hub_online_once\n",
     "from .testing_utils import get_state_dict, hub_online_once\n\n"
     "from fastseq.adapters.peft_method import SCLPeftConfig  # fastseq: SCL's entries in the method gates below\n"),
    ("def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):\n",
     "def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):\n"
     "    if issubclass(config_cls, SCLPeftConfig):  # fastseq: tests/test_multi_adapter.py checks the error\n"
     "        pytest.skip(\"SCL is nonlinear (sigma between C and E / P): it cannot be merged into the base weights\")\n"),
    ("    if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig):\n"
     "        pytest.skip(\"This PEFT method does not support Conv1D layers, skipping this test.\")",
     "    if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, SCLPeftConfig):  # fastseq: + SCL\n"
     "        pytest.skip(\"This PEFT method does not support Conv1D layers, skipping this test.\")"),
    ("        if config_cls not in (LoraConfig, RoadConfig):\n",
     "        if config_cls not in (LoraConfig, RoadConfig, SCLPeftConfig):  # fastseq: + SCLPeftConfig\n"),
    ("        if config_cls not in (LoraConfig,):\n            # note: RoAD",
     "        if config_cls not in (LoraConfig, SCLPeftConfig):  # fastseq: + SCLPeftConfig\n            # note: RoAD"),
]


# Edits of the kept test methods, per module: the same gates as in testing_common.py.
MODULE_EDITS = {
    "tests/test_decoder_models.py": [
        ('        if config_cls != LoraConfig:\n            pytest.skip("Mixed adapter batches not supported for this '
         'config.")',
         '        if config_cls not in (LoraConfig, SCLPeftConfig):  # fastseq: + SCLPeftConfig\n'
         '            pytest.skip("Mixed adapter batches not supported for this config.")', 2),
    ],
}


def show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def segment(lines: list[str], node) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[first - 1:node.end_lineno])


def extract(src: str, class_name: str, case_list: str, helpers: list[str]):
    """(import block, helper functions, prepare_inputs_for_testing, generic test methods)."""
    tree, lines = ast.parse(src), src.split("\n")
    imports = [segment(lines, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    funcs = [segment(lines, n) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in helpers]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    prepare, methods, kept = "", [], []
    for fn in cls.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        if fn.name == "prepare_inputs_for_testing":
            prepare = segment(lines, fn)
        decorators = [ast.get_source_segment(src, d) for d in fn.decorator_list]
        if fn.name not in LEFT_OUT and any(d.endswith(f"{case_list})") for d in decorators):
            methods.append(segment(lines, fn))
            kept.append(fn.name)
    return imports, funcs, prepare, methods, kept


OUR_TESTING_UTILS = ("get_state_dict", "hub_online_once", "set_init_weights_false")


def _our_testing_utils(line: str) -> str:
    """The import of PEFT's testing_utils, narrowed to the helpers our testing_utils.py has (the
    others load hub data sets or mark GPU tests, which the kept methods do not use)."""
    names = [n.strip() for n in line.split("import", 1)[1].split(",")]
    return "from .testing_utils import " + ", ".join(n for n in names if n in OUR_TESTING_UTILS)


def write_module(out: Path, header: str, commit: str, source: str, imports, funcs, cases_import, class_line,
                 class_attrs, prepare, methods, extra="") -> None:
    imports = [_our_testing_utils(i) if i.startswith("from .testing_utils import") else i for i in imports]
    imports = [i for i in imports if "monteclora import" not in i and "lora.config import BdLoraConfig" not in i
               and i != "from peft.tuners import lora"]
    text = (f"{header}\n#\n# fastseq: generated by vendor_peft_tests.py from huggingface/peft {source} at commit "
            f"{commit}:\n# PEFT's imports, helper functions and generic test methods, verbatim; the case lists and "
            f"models\n# come from cases.py (see README.md). Do not edit by hand: rerun the script.\n"
            + "\n".join(imports) + "\n\n" + cases_import + "\n" + extra + "\n\n" + "\n\n\n".join(funcs)
            + f"\n\n\n{class_line}\n{class_attrs}\n\n{prepare}\n\n" + "\n\n".join(methods) + "\n")
    out.write_text(text)


def main(git_dir: str, commit: str) -> None:
    common = show(git_dir, commit, "tests/testing_common.py")
    for old, new in COMMON_EDITS:
        if common.count(old) != 1:
            raise SystemExit(f"testing_common.py at {commit}: expected one {old!r}")
        common = common.replace(old, new)
    (HERE / "testing_common.py").write_text(common)

    specs = [
        ("tests/test_custom_models.py", "TestPeftCustomModel", "TEST_CASES",
         ["_zero_unilora_theta_d", "_reset_unilora_theta_d", "_skip_tests_with_multiple_adapters_with_target_parameters"],
         "from .cases import CUSTOM_CASES as TEST_CASES\nfrom .cases import TinyModels",
         "    transformers_class = TinyModels",
         # PEFT's ModelEmbConv1D is not among these models: an empty tuple makes its isinstance check False.
         "ModelEmbConv1D = ()  # fastseq: PEFT's Conv1D test model, not used here"),
        ("tests/test_decoder_models.py", "TestDecoderModels", "ALL_CONFIGS",
         ["_skip_if_not_conv1d_supported", "_skip_alora_no_activation", "_skip_osf_disable_adapter_test",
          "check_beft_config"],
         "from fastseq import SCLPeftConfig\n\nfrom .cases import DECODER_CONFIGS as ALL_CONFIGS\n"
         "from .cases import DECODER_MODELS as PEFT_DECODER_MODELS_TO_TEST\nfrom .cases import TinyModels",
         "    transformers_class = TinyModels", ""),
        ("tests/test_feature_extraction_models.py", "TestPeftFeatureExtractionModel", "ALL_CONFIGS",
         ["skip_non_prompt_learning", "skip_deberta_lora_tests", "skip_deberta_pt_tests", "deberta_beft_tests"],
         "from .cases import FEATURE_EXTRACTION_CONFIGS as ALL_CONFIGS\nfrom .cases import "
         "FEATURE_EXTRACTION_MODELS as PEFT_FEATURE_EXTRACTION_MODELS_TO_TEST\nfrom .cases import TinyModels",
         "    transformers_class = TinyModels", ""),
    ]
    for path, cls, case_list, helpers, cases_import, attrs, extra in specs:
        src = show(git_dir, commit, path)
        header = "\n".join(src.split("\n")[:LICENSE_HEADER_LINES])
        imports, funcs, prepare, methods, kept = extract(src, cls, case_list, helpers)
        body = "\n\n".join(methods)
        for old, new, count in MODULE_EDITS.get(path, []):
            if body.count(old) != count:
                raise SystemExit(f"{path} at {commit}: expected {count} x {old!r}")
            body = body.replace(old, new)
        methods = [body]
        write_module(HERE / Path(path).name, header, commit, path, imports, funcs, cases_import,
                     f"class {cls}(PeftCommonTester):", attrs, prepare, methods, extra)
        print(f"{Path(path).name}: {len(kept)} test methods")


if __name__ == "__main__":
    main(*sys.argv[1:3])
