import importlib.util

# Like tests/test_peft_method.py (pytest.importorskip("peft")): without peft (the `lora` extra)
# there is no PEFT tester to run; the `dev` extra that CI installs includes it.
if importlib.util.find_spec("peft") is None:
    collect_ignore_glob = ["test_*.py"]
