"""``kvmove-router``: an OpenAI-compatible proxy in front of the engines that sends each
request where its prompt's KV already is (:mod:`sidecar.router.app`), from the engines' KV
events and the controller's index (:mod:`sidecar.router.fleet`)."""
