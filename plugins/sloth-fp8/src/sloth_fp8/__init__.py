"""sloth-fp8: LoRA on frozen base weights stored in FP8 (e4m3), one scale per row."""
