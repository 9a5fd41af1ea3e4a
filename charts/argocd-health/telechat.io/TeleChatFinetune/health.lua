-- Argo CD health of a TeleChatFinetune (telechat.io/v1alpha1), read from the status the telechat-operator writes.
-- A finetune is a run-to-completion job, so it follows Argo CD's built-in Job health: Progressing while it runs
-- (Created, Running, Restarting, Merging), Healthy only once Succeeded (the merged checkpoint exists, so a later
-- sync wave may serve it), Degraded when Failed, Suspended when spec.runPolicy.suspend holds it.
-- Nothing is reported from a status the operator computed for an older spec: Progressing until observedGeneration
-- reaches metadata.generation.
local hs = {}

local function find_condition(conditions, condition_type)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == condition_type then
      return condition
    end
  end
  return nil
end

local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end

local function describe(condition, fallback)
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

-- The newest generation the operator has seen: status.observedGeneration, else the newest condition's.
local function observed_generation(status)
  local observed = status.observedGeneration
  if observed == nil and status.conditions ~= nil then
    for _, condition in ipairs(status.conditions) do
      if condition.observedGeneration ~= nil and (observed == nil or condition.observedGeneration > observed) then
        observed = condition.observedGeneration
      end
    end
  end
  return observed
end

if obj.status == nil or (obj.status.conditions == nil and obj.status.state == nil) then
  hs.status = "Progressing"
  hs.message = "Waiting for the telechat-operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = observed_generation(obj.status)
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the telechat-operator to observe generation " .. string.format("%d", generation)
  return hs
end

local conditions = obj.status.conditions
local state = obj.status.state

local failed = find_condition(conditions, "Failed")
if is_true(failed) or (failed == nil and state == "Failed") then
  hs.status = "Degraded"
  hs.message = failed ~= nil and describe(failed, "Failed") or "Failed"
  return hs
end

local succeeded = find_condition(conditions, "Succeeded")
if is_true(succeeded) or (succeeded == nil and state == "Succeeded") then
  hs.status = "Healthy"
  if obj.status.checkpoint ~= nil then
    hs.message = "Succeeded: merged checkpoint " .. obj.status.checkpoint
  else
    hs.message = succeeded ~= nil and describe(succeeded, "Succeeded") or "Succeeded"
  end
  return hs
end

local suspended = find_condition(conditions, "Suspended")
if is_true(suspended) or (suspended == nil and state == "Suspended") then
  hs.status = "Suspended"
  hs.message = suspended ~= nil and describe(suspended, "Suspended") or "Suspended"
  return hs
end

-- Still on its way: say which phase it is in, most specific first; first of all why it is stuck, if it is
-- (Stalled: rank pods Unschedulable, ImagePullBackOff, ... -- the user must act, but the job has not failed).
hs.status = "Progressing"
for _, phase in ipairs({ "Stalled", "Merging", "Restarting", "Running", "Created" }) do
  local condition = find_condition(conditions, phase)
  if is_true(condition) then
    hs.message = describe(condition, phase)
    return hs
  end
end
hs.message = "State " .. (state or "Pending")
return hs
