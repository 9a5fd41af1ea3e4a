"""The TeleChatFinetune controller: spec, state machine, builders (pure), progress polling and the kopf handlers."""
