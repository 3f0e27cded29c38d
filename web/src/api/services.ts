// The generated service descriptors and the shared client instance.

import { ApiClient } from "./client";

export { DefinitionService } from "../gen/ccm/v1/definition_pb";
export { EventService } from "../gen/ccm/v1/event_pb";
export { InstanceService } from "../gen/ccm/v1/instance_pb";
export { WorkerService } from "../gen/ccm/v1/worker_pb";
export { TemplateService } from "../gen/ccm/v1/template_pb";
export { SchedulerService } from "../gen/ccm/v1/scheduler_pb";
export { ControllerService } from "../gen/ccm/v1/controller_pb";

/** The client every page uses (same origin as the gateway). */
export const api = new ApiClient();

/** Most items a "list everything" helper fetches before it stops paging. */
export const LIST_ALL_CAP = 5000;

/**
 * Follows next_page_token until the last page (or LIST_ALL_CAP items).
 * `page` fetches one page given a token and returns its items and the next token.
 */
export async function listAll<T>(page: (token: string) => Promise<{ items: T[]; next: string }>): Promise<T[]> {
  const out: T[] = [];
  let token = "";
  for (;;) {
    const { items, next } = await page(token);
    out.push(...items);
    if (!next || out.length >= LIST_ALL_CAP || next === token) return out;
    token = next;
  }
}
