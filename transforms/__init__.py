"""lmc-audit's Beam transforms, one subpackage per stage: ``reading``, ``documents``, ``scoring``, ``coding``,
``dedup``, ``manifests``; ``records`` holds the elements that flow between them."""
