# PEFT's generic tests (PeftCommonTester) run with SCL beside LoRA; see README.md here.
