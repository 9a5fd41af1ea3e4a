"""The TeleChatInference controller: spec, status, builders and planners (pure), and the kopf handlers."""
