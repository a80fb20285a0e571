-- saga_list filtered by definition, newest first (the admin view and
-- ListSagas(definition = …)).
CREATE INDEX sagas_definition_created_at_list_idx ON sagas (definition, created_at DESC, saga_id DESC);
