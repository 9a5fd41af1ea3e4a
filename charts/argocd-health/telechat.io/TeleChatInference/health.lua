-- Argo CD health of a TeleChatInference (telechat.io/v1alpha1), read from the status the telechat-operator writes
-- (conditions Available, Progressing and Ready, each with observedGeneration).
-- Healthy only when the operator has seen the current spec, Ready is True and no rollout is under way; Degraded
-- when the operator reports a failure it cannot progress past (an invalid spec, a failed source finetune, no
-- progress and nothing available); Progressing otherwise, including while the status is missing or stale.
local hs = {}

-- Reasons that mean the deployment cannot become Ready without a change by the user.
local FAILURE_REASONS = {
  InvalidSpec = true,
  FinetuneFailed = true,
  ModelMismatch = true,
  ProgressDeadlineExceeded = true,
}
-- Progressing reasons that mean the rollout is finished.
local SETTLED_REASONS = {
  RolloutComplete = true,
  AllReplicasReady = true,
  ScaledToZero = true,
  NewReplicaSetAvailable = true,
}

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

local function describe(condition, fallback)
  local text = condition.reason or fallback
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

local function is_stale(condition, generation)
  return generation ~= nil and condition.observedGeneration ~= nil and condition.observedGeneration < generation
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the telechat-operator to report status"
  return hs
end

local generation = obj.metadata.generation
local status = obj.status
local observed = status.observedGeneration
local ready = find_condition(status.conditions, "Ready")
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the telechat-operator to observe generation " .. string.format("%d", generation)
  return hs
end
if ready == nil or is_stale(ready, generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the telechat-operator to evaluate readiness of the current spec"
  return hs
end

for _, condition_type in ipairs({ "Ready", "Progressing", "Available" }) do
  local condition = find_condition(status.conditions, condition_type)
  if condition ~= nil and condition.status ~= "True" and FAILURE_REASONS[condition.reason] then
    hs.status = "Degraded"
    hs.message = describe(condition, condition_type)
    return hs
  end
end

local progressing = find_condition(status.conditions, "Progressing")
local available = find_condition(status.conditions, "Available")
if ready.status ~= "True" and progressing ~= nil and progressing.status == "False"
    and available ~= nil and available.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "NotReady") .. " (not progressing: " .. describe(progressing, "Progressing") .. ")"
  return hs
end

if ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = describe(ready, "NotReady")
  return hs
end

if progressing ~= nil and progressing.status == "True" and not SETTLED_REASONS[progressing.reason] then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Progressing")
  return hs
end

hs.status = "Healthy"
local ready_replicas = status.readyReplicas or 0
hs.message = string.format("%d ready replica(s)", ready_replicas)
if status.endpoint ~= nil then
  hs.message = hs.message .. " at " .. status.endpoint
end
return hs
