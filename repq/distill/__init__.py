"""Self-distillation: progressive LDLQ quantization with KL training between groups (`repq distill`)."""
