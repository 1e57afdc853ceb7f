-- The alert sweep looks for pending alerts whose for_s has passed on the wall clock; pending
-- ones are few, so a partial index finds them without reading every rule's state.
CREATE INDEX alert_states_pending ON registry.alert_states (changed_at) WHERE state = 'pending';
