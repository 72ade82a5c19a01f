"""Models: ShapeLSTM (dense or mixture-density head), CharLSTM, WordLM (Zaremba et al.)."""
