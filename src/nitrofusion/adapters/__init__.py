"""Model adapters: the family-specific answers (prompts, UNet calls, backbone calls, decoding)."""
